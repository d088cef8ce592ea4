"""Data: synthetic long-context tasks, text corpora and tokenizers."""

from .base import IGNORE, Batches
from .tasks import MQAR, TASKS, Example, FactQA, PassKey, TaskBatches, exact_match, generate, make_task, score
from .text import Corpus, TextBatches, cached_tokens, load_corpus, windows
from .tokenizers import ByteTokenizer, get_tokenizer, load_tokenizer

__all__ = ["IGNORE", "Batches", "MQAR", "TASKS", "Example", "FactQA", "PassKey", "TaskBatches", "exact_match",
           "generate", "make_task", "score", "Corpus", "TextBatches", "cached_tokens", "load_corpus", "windows",
           "ByteTokenizer", "get_tokenizer", "load_tokenizer"]
