"""Network recipes, one module per family. Importing a module registers its recipes."""
