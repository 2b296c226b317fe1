"""Tiny random-initialized LLaVA checkpoints, built entirely offline.

Tests and the README quickstart need a real ``LlavaForConditionalGeneration`` checkpoint on disk
(config, safetensors weights, tokenizer, image processor, chat template) without touching the
model hub. :func:`make_tiny_llava` builds one in well under a second: the tokenizer is a byte-level
BPE trained on a few embedded paragraphs, the weights are random but deterministic from
``TinySpec.seed``.

"Random" is made deliberately non-trivial: transformers initializes biases to zero and norm
weights to one, which would let an exporter that drops a bias or a norm scale pass every
comparison. Here every bias and every norm weight is random, the init std is large enough that
logits are not all ~0, and the result is checked after construction.

The chat template leaves ``<s>`` to the tokenizer, as llava-hf checkpoints do. So
``processor.apply_chat_template(..., tokenize=True)`` and ``processor(text=rendered)`` start with
``<s>``, but ``tokenizer.apply_chat_template(..., tokenize=True)`` does not: transformers never adds
special tokens there. Render with ``tokenize=False`` and tokenize the string instead.

torch, transformers and tokenizers are imported inside the functions, so importing this module
(e.g. for :class:`TinySpec`) stays cheap, like importing ``rlens`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlens.errors import RlensError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

BACKBONES = ("llama", "mistral", "qwen2")

# Special tokens in id order: ids 0..4. <s>=1 and </s>=2 match the llama convention.
UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)
VOCAB_SIZE = 500

# Spread of the random init. Large enough that hidden states and logits are well away from zero
# (so greedy decoding is not one repeated token), small enough that nothing saturates.
TEXT_INIT_STD = 0.1
VISION_INIT_STD = 0.1
NORM_WEIGHT_STD = 0.1  # norm weights are 1 + NORM_WEIGHT_STD * randn
BIAS_STD = 0.05  # every bias is BIAS_STD * randn

# The tokenizer's training text: a few paragraphs in the register of image-question prompts, so
# typical test prompts tokenize into a handful of real merges rather than single bytes.
CORPUS = """\
The image shows a red circle in the top left corner and a blue square in the bottom right corner.
A small green triangle sits in the middle of the picture, between the circle and the square.
There are three yellow stars above the triangle and two black lines below it.
What color is the circle? The circle is red. What shape is in the center? A green triangle.

Describe the image. The picture has a white background with several colorful shapes on it.
On the left side there is a large orange rectangle; on the right side there is a purple oval.
The shapes do not overlap. Each shape has a thin dark border and a bright solid fill.
The colors are red, orange, yellow, green, blue, purple, pink, brown, gray, black and white.

How many circles are in the photo? There are four circles: one, two, three, four.
Count the squares from left to right. The first square is blue, the second is red,
the third is green and the fourth is yellow. There are five, six, seven or eight small dots
near the top edge, and nine or ten larger dots near the bottom edge of the image.

Where is the cat? The cat is next to the window, under the table, behind a brown chair.
The dog is in front of the door, above the rug, on the right of the lamp.
A person is standing at the center of the scene, holding a round red ball in one hand.
The sky in the background is light blue, and the grass in the foreground is dark green.

USER: What is in this image? ASSISTANT: This image shows a simple drawing of shapes and colors.
USER: Is the square bigger than the circle? ASSISTANT: Yes, the square is bigger than the circle.
USER: Which object is closest to the top? ASSISTANT: The yellow star is closest to the top.
Answer the question with a single word or phrase. Please look at the picture carefully.
"""

# LLaVA-1.5 conversation format ("vicuna_v1": separator " " after user turns, "</s>" after
# assistant turns), rendered as:
#   [system ]USER: <image>\n{text} ASSISTANT: {reply}</s>USER: {text} ASSISTANT:
# Content items are emitted in the order given, so text before the image works too. No <s>: the
# tokenizer's post-processor adds it, and adding it here as well would double it.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + render(message['content']) + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'ASSISTANT: ' }}{% generation %}{{ render(message['content']) + '</s>' }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny LLaVA checkpoint; every field has a small default so ``TinySpec()`` just works.

    The defaults give GQA (4 query heads over 2 kv heads), a 3-layer CLIP tower whose second-to-last
    layer feeds the projector (as in LLaVA-1.5), and 16 visual tokens per image.
    """

    backbone: str = "llama"  # llama | mistral | qwen2
    num_layers: int = 2  # decoder layers
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA when < num_heads
    vision_layers: int = 3
    vision_hidden: int = 32
    vision_heads: int = 4
    image_size: int = 32
    patch_size: int = 8  # -> (32/8)^2 = 16 visual tokens with CLS dropped
    sliding_window: int | None = None  # mistral / qwen2 only
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image: one per patch (the CLS token is dropped by the "default" strategy)."""
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Reject specs transformers would accept but that give a broken or misleading checkpoint."""
        if self.backbone not in BACKBONES:
            raise RlensError(f"unknown backbone {self.backbone!r}; use one of {', '.join(BACKBONES)}")
        if self.image_size % self.patch_size:
            raise RlensError(f"image_size {self.image_size} not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise RlensError(
                f"hidden_size {self.hidden_size}, num_heads {self.num_heads}, num_kv_heads "
                f"{self.num_kv_heads}: hidden_size must divide by num_heads and num_heads by num_kv_heads"
            )
        if self.vision_hidden % self.vision_heads:
            raise RlensError(f"vision_hidden {self.vision_hidden} is not a multiple of vision_heads")
        if self.vision_layers < 2:
            raise RlensError("vision_layers must be at least 2 (features come from the second-to-last layer)")
        if self.sliding_window is not None and self.backbone == "llama":
            raise RlensError("sliding_window is only supported for the mistral and qwen2 backbones")


def make_tiny_llava(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a tiny random LLaVA checkpoint (model, processor, generation config) to ``out_dir``.

    The directory loads offline with ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` and
    ``AutoProcessor.from_pretrained(out_dir)``. The same spec always gives the same weights and
    tokenizer, so tests can compare against fixed expectations. Returns ``out_dir`` as a Path.
    """
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer()
    processor = make_processor(tokenizer, spec.image_size, spec.patch_size)
    _check_processor(processor, spec)

    config = _make_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    _randomize(model, torch.Generator().manual_seed(spec.seed + 1))
    _check_model(model, spec)

    model.generation_config = greedy_generation(tokenizer)
    save_checkpoint(model, processor, out)

    # What tests and users load is the saved processor, so check that one too.
    _check_processor(AutoProcessor.from_pretrained(out), spec)
    return out


def greedy_generation(tokenizer: PreTrainedTokenizerFast, **extra: Any) -> Any:
    """The GenerationConfig rlens' checkpoints carry: greedy, with the tokenizer's special ids, so
    ``generate`` and the exported runtime stop and pad alike."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        **extra,
    )


def make_processor(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int,
    patch_size: int,
    strategy: str = "default",
    chat_template: str = CHAT_TEMPLATE,
) -> Any:
    """LLaVA-1.5's processor: a CLIP image processor, ``tokenizer`` and the chat template; one image
    token per patch, plus CLS (which the "default" strategy drops again and "full" keeps)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=make_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template,
        num_additional_image_tokens=1,  # CLIP's CLS token, which "default" then drops again
    )


def save_checkpoint(model: Any, preprocessor: Any, out: Path) -> None:
    """``save_pretrained`` of a model (safetensors) and its processor or tokenizer into ``out``, without
    transformers' "Writing model shards" bar: for a file of a few MB it is just noise."""
    from transformers.utils import logging as hf_logging

    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    preprocessor.save_pretrained(out)


def _train_bpe(corpus: str = CORPUS, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE on ``corpus``, so every string is encodable and common words are one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise RuntimeError(f"special token {token} got id {tok.token_to_id(token)}, expected {i}")
    # LLaVA tokenizers prepend <s> themselves; the chat template relies on it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def make_tokenizer(corpus: str = CORPUS, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Wrap the trained BPE as a transformers tokenizer with llava-style bos handling.

    The bos comes from the backend's post-processor, not from ``add_bos_token=True``: transformers 5
    drops ``add_bos_token`` when saving and keeps only tokenizer.json's post-processor, so this way
    the fresh and the reloaded tokenizer behave (and report ``add_bos_token``) the same.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(corpus, vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",  # batched generation pads on the left
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )
    ids = tokenizer("hi")["input_ids"]
    if ids[0] != tokenizer.bos_token_id or ids.count(tokenizer.bos_token_id) != 1:
        raise RuntimeError(f"tokenizer should prepend exactly one <s>, got {ids}")
    if tokenizer.encode(IMAGE + IMAGE, add_special_tokens=False) != [SPECIAL_TOKENS.index(IMAGE)] * 2:
        raise RuntimeError("<image> must encode to a single token")
    return tokenizer


def make_image_processor(image_size: int) -> Any:
    """A CLIP image processor at ``image_size`` (the PIL backend: it needs no torchvision)."""
    from transformers import CLIPImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        resample=PILImageResampling.BICUBIC,
        do_resize=True,
        do_center_crop=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def _make_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> Any:
    """LlavaConfig: CLIP vision tower + the spec's decoder, wired to the tokenizer's special ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, Qwen2Config

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="quick_gelu",
        initializer_range=VISION_INIT_STD,
    )
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": 512,
        "initializer_range": TEXT_INIT_STD,
        # transformers 5 keeps rope_theta inside rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.backbone == "llama":
        text = LlamaConfig(**common, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False)
    elif spec.backbone == "mistral":
        text = MistralConfig(**common, rms_norm_eps=1e-6, sliding_window=spec.sliding_window)
    else:
        text = Qwen2Config(
            **common,
            rms_norm_eps=1e-6,
            use_sliding_window=spec.sliding_window is not None,
            sliding_window=spec.sliding_window,
            # Qwen2 slides only on layers >= max_window_layers (default 28, i.e. none of ours);
            # 0 makes every layer slide, like mistral.
            max_window_layers=0,
        )
    return llava_15_config(vision, text, tokenizer, spec.num_image_tokens)


def llava_15_config(vision: Any, text: Any, tokenizer: PreTrainedTokenizerFast, visual_tokens: int) -> Any:
    """LlavaConfig with LLaVA-1.5's choices around the given tower and decoder configs: feature layer
    -2, CLS dropped ("default"), GELU projector, untied embeddings, float32 throughout."""
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=visual_tokens,  # the default is llava-1.5's 576
        tie_word_embeddings=False,
    )
    for c in (config, config.text_config, config.vision_config):
        c.dtype = "float32"
    return config


def _is_norm(module: torch.nn.Module) -> bool:
    """RMSNorm (one class per backbone, e.g. ``LlamaRMSNorm``) or the vision tower's LayerNorm."""
    import torch

    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _randomize(model: LlavaForConditionalGeneration, gen: torch.Generator) -> None:
    """Give every bias and every norm weight random values (transformers inits them to 0 and 1)."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if _is_norm(module) and isinstance(weight, torch.nn.Parameter):
                weight.copy_(1.0 + NORM_WEIGHT_STD * torch.randn(weight.shape, generator=gen))
            if isinstance(bias, torch.nn.Parameter):
                bias.copy_(BIAS_STD * torch.randn(bias.shape, generator=gen))


def _check_model(model: LlavaForConditionalGeneration, spec: TinySpec) -> None:
    """Fail loudly if the random init came out trivial (zero biases, unit norms, near-zero logits)."""
    import torch

    lm = model.model.language_model
    attn = lm.layers[0].self_attn
    if spec.backbone == "qwen2":
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            if proj.bias is None or proj.bias.abs().max() == 0:
                raise RuntimeError("qwen2 q/k/v biases must exist and be non-zero")
    elif attn.q_proj.bias is not None:
        raise RuntimeError(f"{spec.backbone} attention must have no bias")
    for name, module in model.named_modules():
        if _is_norm(module) and torch.all(module.weight == 1):
            raise RuntimeError(f"norm weight {name} is still all ones")
    if model.lm_head.weight.data_ptr() == lm.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head must not be tied to the embeddings")
    for name, param in model.named_parameters():
        if param.dtype != torch.float32 or not torch.isfinite(param).all():
            raise RuntimeError(f"parameter {name} is not finite float32")

    gen = torch.Generator().manual_seed(spec.seed)
    n_img = spec.num_image_tokens
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(len(SPECIAL_TOKENS), vocab, (1, n_img + 8), generator=gen)
    ids[0, 0] = model.config.text_config.bos_token_id
    ids[0, 2 : 2 + n_img] = model.config.image_token_id
    pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    spread = logits.std(dim=-1).min().item()
    if not spread > 0.1:
        raise RuntimeError(f"logits are nearly constant per position (std {spread:.3g}); init too small")


def _check_processor(processor: Any, spec: TinySpec) -> None:
    """The processor must expand one ``<image>`` to exactly the number of visual features the model makes."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.zeros((spec.image_size + 5, spec.image_size + 9, 3), dtype=np.uint8))
    inputs = processor(images=image, text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE)
    n = int((inputs["input_ids"] == image_id).sum())
    if n != spec.num_image_tokens:
        raise RuntimeError(f"processor expanded <image> to {n} tokens, expected {spec.num_image_tokens}")
    shape = tuple(inputs["pixel_values"].shape)
    if shape != (1, 3, spec.image_size, spec.image_size):
        raise RuntimeError(f"processor made pixel_values of shape {shape}")
    if inputs["input_ids"][0, 0] != processor.tokenizer.bos_token_id:
        raise RuntimeError("processor output does not start with <s>")


# -- a tiny CLIP for TRIM ------------------------------------------------------------------------
# CLIP-style special tokens, added after training so they get the highest ids, as in OpenAI's
# vocabulary (the legacy eos_token_id == 2 configs pool at the argmax id, which must be the eos).
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_VOCAB_SIZE = 700  # 512 byte symbols (plain and word-final), merges, 2 specials
CLIP_MAX_POSITIONS = 77
CLIP_PRETOKENIZE = (  # OpenAI CLIP's word split
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def _train_clip_bpe(corpus: str = CORPUS, vocab_size: int = CLIP_VOCAB_SIZE) -> Tokenizer:
    """CLIP's tokenizer pipeline (lowercase, CLIP's split, byte-level, ``</w>`` word ends) on ``corpus``.

    The merges are learned here rather than by ``tokenizers``' trainer, whose tie-breaking with an
    end-of-word suffix changes from run to run: the most frequent pair first, ties to the smallest.
    As in OpenAI's vocabulary, ids are the 256 byte symbols, the same with ``</w>``, the merges,
    then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    from collections import Counter
    from itertools import pairwise

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PRETOKENIZE), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    counts = Counter(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(corpus)))
    words = {(*w[:-1], w[-1] + "</w>"): n for w, n in counts.items()}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = [*alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size - 2:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged = {}
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged

    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>")
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.Sequence([decoders.Replace("</w>", " "), decoders.ByteLevel()])
    tok.add_special_tokens([CLIP_BOS, CLIP_EOS])
    bos, eos = tok.token_to_id(CLIP_BOS), tok.token_to_id(CLIP_EOS)
    if eos != tok.get_vocab_size() - 1 or bos != eos - 1:
        raise RuntimeError(f"CLIP special tokens got ids {bos}, {eos}; expected the last two")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        pair=f"{CLIP_BOS} $A {CLIP_EOS} $B {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, bos), (CLIP_EOS, eos)],
    )
    return tok


def make_clip_tokenizer(corpus: str = CORPUS, vocab_size: int = CLIP_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """CLIP's conventions (bos/eos wrap, eos padding, lowercase) over a BPE trained on ``corpus``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_clip_bpe(corpus, vocab_size),
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        pad_token=CLIP_EOS,  # as OpenAI's CLIP tokenizer: padding is eos, pooling takes the first one
        padding_side="right",
        model_max_length=CLIP_MAX_POSITIONS,
    )
    ids = tokenizer("What COLOR is the circle?")["input_ids"]
    if ids[0] != tokenizer.bos_token_id or ids[-1] != tokenizer.eos_token_id or ids.count(ids[-1]) != 1:
        raise RuntimeError(f"CLIP tokenizer should wrap text in one bos and one eos, got {ids}")
    if ids != tokenizer("what color is the circle?")["input_ids"]:
        raise RuntimeError("CLIP tokenizer must lowercase")
    return tokenizer


def make_tiny_clip(out_dir: str | Path, llava_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPModel`` and tokenizer whose vision tower is the LLaVA's at ``llava_dir``.

    The vision model is a copy of LLaVA's tower (same config, same tensors, post_layernorm included),
    so TRIM's tower check passes; the text model (2 layers, width 32, 4 heads, 77 positions), the
    projections (to 16) and every bias and norm weight are random, deterministic from ``seed``. Loads
    offline with ``CLIPModel.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    tower = llava.model.vision_tower
    tokenizer = make_clip_tokenizer()

    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_POSITIONS,
        hidden_act="quick_gelu",
        initializer_range=TEXT_INIT_STD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=tower.config.to_dict(), projection_dim=16)
    config.dtype = "float32"
    torch.manual_seed(seed)
    model = CLIPModel(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    _randomize(model, gen)
    with torch.no_grad():
        for proj in (model.text_projection, model.visual_projection):
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * proj.in_features**-0.5)
        missing = model.vision_model.load_state_dict(tower.state_dict(), strict=True)
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"vision tower copy mismatch: {missing}")

    save_checkpoint(model, tokenizer, out)
    return out
