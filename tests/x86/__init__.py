"""Tests of the x86 boot code: loaders, boot parameters, e820 and MP tables."""
