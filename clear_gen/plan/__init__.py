"""Everything that loads nothing: the run spec (`spec`: what was asked and what a run will do), the one
parser of the arguments (`parse`), the sampler recipes (`recipe`), the spec <-> PNG record mapping
(`records`), the memory model and offload decision (`memory`), the GPU table (`gpus`). May import
`core`, `models`, `attention`, `files`, `weights` and `errors`."""
