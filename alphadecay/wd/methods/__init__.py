"""The weight-decay methods, one file each; alphadecay/wd/registry.py names them."""
