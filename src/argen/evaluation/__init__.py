"""Evaluation: ADM-protocol FID / sFID / IS / precision / recall and reconstruction metrics."""
