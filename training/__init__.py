"""The training face: produces the models the service serves (distillation, slide heads); see README.md."""
