"""The runtime: linear(), the compressed modules, the custom op and save/load."""
