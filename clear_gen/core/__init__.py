"""Pure math and primitives, importing nothing of clear_gen's but `errors`: CLEAR's geometry (token
order, masks, block lists), exact RoPE positions, the FLOP model, devices and dtypes as users name them,
the clock (synchronised timing), torchrun's environment read without torch, projected-flow guidance's
formulas on a latent grid (`guide`) and the tile grid of the VAE's exact tiling (`tiles`)."""
