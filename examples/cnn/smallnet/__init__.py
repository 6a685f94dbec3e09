"""The CNN example's model package (the spec's `factory = "smallnet.model:make_model"`)."""
