"""The `advmoe` command line (`cli.main:main`), above the model core and the applications."""
