"""Building blocks that several methods share (as timm's ``layers/``): the tuned model and its head,
prompted forward passes, bottleneck adapters. They wrap timm modules; nothing of timm is forked."""
