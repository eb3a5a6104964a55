"""Tiny random-weight models of the families docembed is used with, built offline (nothing comes from the
hub): each family's own transformers classes and a tokenizer of its kind (a sentencepiece-style Unigram
for XLM-RoBERTa, a WordPiece with ``<s> ... </s>`` for MPNet), trained in a few milliseconds on
``CORPUS``; BERT gets MiniLM's own tokenizer, as ``tests/conftest.py``'s tiny models do.
``sentence_transformers_folder`` saves any of them with a module stack and named prompts, as a hub
model's folder holds them.

Weights are drawn with ``initializer_range`` 0.2, not transformers' 0.02: at 0.02 a tiny encoder's
vectors hardly depend on the text (conftest's BERT gives every text the same CLS vector to cosine
0.99999), so a comparison at cosine 0.9999 could not fail; at 0.2 different texts stay below 0.999."""

from __future__ import annotations

from pathlib import Path

# Several scripts, so that the multilingual tokenizers learn pieces for each (and fall back to single
# characters, not to <unk>, on the test texts).
CORPUS = [
    "A short one.", "Mixed CASE Words and Ünïcode, with a longer tail", "query: passage: search_document: hello",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.", "敏捷的棕色狐狸跳过了懒狗。",
    "Represent this sentence for searching relevant passages: the numbers 0 1 2 3 4 5 6 7 8 9",
]
# XLM-R's and MPNet's special tokens, at the ids their real vocabularies give them (<pad> is 1: the
# position ids of RoBERTa-style models count from the padding id).
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
HIDDEN = 32
INIT = 0.2  # initializer_range: see above


def _template():
    from tokenizers import processors

    return processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                         special_tokens=[("<s>", 0), ("</s>", 2)])


def unigram_tokenizer(vocab_size: int = 400):
    """An XLM-R tokenizer (transformers' class, fast) around a Unigram model with the Metaspace
    pre-tokenizer, as sentencepiece models are converted: ``<s> text </s>``, ``<pad>`` = 1."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizerFast

    core = Tokenizer(models.Unigram())
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    core.train_from_iterator(CORPUS * 4, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                                 unk_token="<unk>", show_progress=False))
    core.post_processor = _template()
    return XLMRobertaTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def wordpiece_tokenizer(vocab_size: int = 400):
    """An MPNet tokenizer (transformers' class, fast): lower-casing WordPiece, ``<s> text </s>``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import MPNetTokenizerFast

    core = Tokenizer(models.WordPiece(unk_token="<unk>"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.train_from_iterator(CORPUS * 4, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                                   show_progress=False))
    core.post_processor = _template()
    return MPNetTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def xlm_roberta(path: Path, window: int = 64, seed: int = 0) -> Path:
    """A 2-layer XLM-RoBERTa (the base of paraphrase-multilingual-mpnet and multilingual-e5) with a
    Unigram tokenizer, as transformers saves it; its position table holds ``window`` + 2 positions, as
    RoBERTa-style models' do (514 for a 512-token window)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    tokenizer = unigram_tokenizer()
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64, max_position_embeddings=window + 2,
                              pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                              initializer_range=INIT)
    torch.manual_seed(seed)
    XLMRobertaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def mpnet(path: Path, window: int = 64, seed: int = 0) -> Path:
    """A 2-layer MPNet (the base of all-mpnet-base-v2) with a WordPiece tokenizer; MPNet takes no
    token_type_ids."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    tokenizer = wordpiece_tokenizer()
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=window + 2, pad_token_id=1,
                         initializer_range=INIT)
    torch.manual_seed(seed)
    MPNetModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def bert(path: Path, tokenizer, positions: int = 128, seed: int = 0) -> Path:
    """A 2-layer BERT (the base of MiniLM, BGE, E5 (English), GTE and mxbai) with ``tokenizer``
    (MiniLM's: conftest's ``reference_model.tokenizer``)."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=positions, initializer_range=INIT)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentence_transformers_folder(path: Path, base, window: int, stack, prompts: dict | None = None,
                                 trust_remote_code: bool = False, seed: int = 0) -> str:
    """A sentence-transformers folder at ``path``: the transformers folder ``base`` with
    ``stack(modules)``'s modules after it (e.g. ``lambda m: [m.Pooling(32, "cls"), m.Normalize()]``) and
    the model's own named ``prompts`` (``config_sentence_transformers.json``)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules

    trust = {"trust_remote_code": True} if trust_remote_code else {}
    torch.manual_seed(seed)  # Dense layers' weights
    transformer = modules.Transformer(str(base), max_seq_length=window, model_kwargs=trust, config_kwargs=trust,
                                      processor_kwargs=trust)
    SentenceTransformer(modules=[transformer, *stack(modules)], prompts=prompts or {}).save(str(path))
    return str(path)


# A model architecture transformers does not know, in the model's own folder, as nomic-embed-text's
# NomicBertModel is: loading it runs this code, which only --trust-remote-code allows.
REMOTE_CONFIG = '''
from transformers import PretrainedConfig


class TinyEncoderConfig(PretrainedConfig):
    model_type = "docembed-tiny-encoder"

    def __init__(self, vocab_size=100, hidden_size=32, max_position_embeddings=66, pad_token_id=1, **kwargs):
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.max_position_embeddings = max_position_embeddings
'''

REMOTE_MODEL = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tiny_encoder import TinyEncoderConfig


class TinyEncoderModel(PreTrainedModel):
    """Token and position embeddings, one transformer encoder layer that ignores padding."""

    config_class = TinyEncoderConfig
    base_model_prefix = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.positions = torch.nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layer = torch.nn.TransformerEncoderLayer(config.hidden_size, 2, 64, dropout=0.0, batch_first=True)
        self.post_init()

    def _init_weights(self, module):
        pass  # torch's own initialisation: random weights, saved and loaded whole

    def forward(self, input_ids=None, attention_mask=None, return_dict=True, **kwargs):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = self.tokens(input_ids) + self.positions(positions)
        padding = None if attention_mask is None else attention_mask == 0
        return BaseModelOutput(last_hidden_state=self.layer(hidden, src_key_padding_mask=padding))
'''


def remote_code(path: Path, window: int = 64, seed: int = 0) -> Path:
    """A transformers folder whose ``config.json`` names its own classes (``auto_map``) in Python files
    beside it, with the Unigram tokenizer."""
    import json

    import torch

    tokenizer = unigram_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_tiny_encoder.py").write_text(REMOTE_CONFIG)
    (path / "modeling_tiny_encoder.py").write_text(REMOTE_MODEL)
    config = {"model_type": "docembed-tiny-encoder", "architectures": ["TinyEncoderModel"],
              "auto_map": {"AutoConfig": "configuration_tiny_encoder.TinyEncoderConfig",
                           "AutoModel": "modeling_tiny_encoder.TinyEncoderModel"},
              "vocab_size": len(tokenizer), "hidden_size": HIDDEN, "max_position_embeddings": window + 2,
              "pad_token_id": 1}
    (path / "config.json").write_text(json.dumps(config))
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(_config(path), trust_remote_code=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, trust_remote_code=True)
