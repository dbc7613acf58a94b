"""eval: the deployment evaluated on tasks through its OpenAI API, against its unquantized reference."""
