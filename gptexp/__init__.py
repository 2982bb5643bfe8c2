"""gptexp: the book's chapter-5 GPT pretraining, exact and fast, tracked in MLflow, swept with Optuna.

The top level keeps the book's names and semantics, so `from gptexp import ...` can replace the
book's imports and give the same numbers.
"""

from .book import evaluate_model, generate_and_print_sample, plot_losses, train_model, train_model_simple
from .datasets import GPTDatasetV1, create_dataloader_v1, split_text
from .evaluation import SplitLoss, calc_loss_batch, calc_loss_loader, evaluate_split, perplexity
from .generation import generate, generate_text_simple, text_to_token_ids, token_ids_to_text
from .model import GPT_CONFIG_124M, GPTModel, GPTModelFast, KVCache
from .tokenizer import get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPTModel",
    "GPTModelFast",
    "GPT_CONFIG_124M",
    "KVCache",
    "GPTDatasetV1",
    "create_dataloader_v1",
    "split_text",
    "text_to_token_ids",
    "token_ids_to_text",
    "generate_text_simple",
    "generate",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_split",
    "SplitLoss",
    "perplexity",
    "get_tokenizer",
    "train_model_simple",
    "evaluate_model",
    "generate_and_print_sample",
    "plot_losses",
    "train_model",
]
