"""Command-line interface: thin argparse front ends that build a config and call the library."""
