"""The `lqae` command line. Parses arguments, calls the library, renders; holds no model logic."""
