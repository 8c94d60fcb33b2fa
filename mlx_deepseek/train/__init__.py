"""Training: synthetic reasoning tasks (`tasks`), the tokenizer (`vocab`), packing (`data`), expert balancing
(`balance`), the shared loop (`loop`), pretraining (`pretrain`) and cold-start SFT (`sft`).

Modules are imported on use (`from mlx_deepseek.train import tasks`), so importing the library stays light.
"""
