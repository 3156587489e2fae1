"""Generation: the job runner (`generate`: generate and upscale), one image's stages (`render`), measuring
steps and full attention (`measure`), speed options (`speed`), projected-flow guidance in an SDEdit
stage's call (`guide`), compare, and the one torchrun world (`world`) that generate, bench and distill
share. May import everything below it: `core`, `models`, `attention`, `files`, `weights`, `plan`."""
