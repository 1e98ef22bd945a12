"""Sample images from a tokenizer + generator checkpoint pair."""


def add_arguments(parser):
    pass


def run(args):
    return 0
