"""One module per DVC stage (see dvc.yaml): parse params.yaml, call the library, write outs."""
