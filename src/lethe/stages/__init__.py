"""The `lethe <stage>` entry points, one module per DVC stage, each named after its stage: read params,
call the library, write the outputs. Nothing outside this package (and the CLI) imports from it."""
