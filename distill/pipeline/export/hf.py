"""Export a ``vit`` student as a Hugging Face ``transformers`` ``CLIPModel`` folder.

The ``vit`` student is an ``open_clip.CLIP`` whose layout is CLIP's: patch conv without bias,
class token, learned positional embeddings, ``ln_pre``, pre-LN residual blocks (fused QKV
attention, GELU MLP), ``ln_post`` on the class token, linear projections; a causal text
transformer pooled at the EOT token (id 49407, the highest id), ``ln_final``. Each tensor maps one
to one onto ``CLIPModel`` (the fused QKV is split into q/k/v); the text tower must be causal (HF's
CLIP text model always is). ``export_hf(student, DIR)`` writes ``config.json`` +
``model.safetensors`` (``CLIPModel.from_pretrained(DIR)`` loads it offline), a
``preprocessor_config.json`` and the CLIP BPE tokenizer files (``vocab.json``, ``merges.txt``,
padding with id 0 as the student does), so ``CLIPTokenizer.from_pretrained(DIR)`` gives the
student's token ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from students.base import Student
from students.tokenizers import clip_tokenizer
from distill.core.errors import HFExportError


def hf_clip_config(student: Student) -> dict[str, Any]:
    """``CLIPConfig`` kwargs describing the ``vit`` student; :class:`HFExportError` if it does not map."""
    cfg = getattr(student, "cfg", None)
    if student.name != "vit" or cfg is None:
        raise HFExportError(f"the {student.name!r} student has no Hugging Face CLIPModel equivalent (only 'vit' "
                            "students map onto CLIPModel); export it with --format onnx")
    if not cfg.causal_text:
        raise HFExportError("the vit student's text tower is not causal (causal_text=false); Hugging Face's "
                            "CLIP text model always applies a causal mask. Export it with --format onnx")
    act = "gelu"  # open_clip_model_cfg() sets quick_gelu=False: nn.GELU (exact erf)
    common = {"hidden_act": act, "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "projection_dim": cfg.embed_dim}
    text = {**common, "vocab_size": cfg.vocab_size, "hidden_size": cfg.text_width,
            "intermediate_size": int(cfg.text_width * cfg.mlp_ratio), "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads, "max_position_embeddings": cfg.context_length,
            "pad_token_id": 0, "bos_token_id": 49406, "eos_token_id": 49407}
    vision = {**common, "hidden_size": cfg.vision_width, "intermediate_size": int(cfg.vision_width * cfg.mlp_ratio),
              "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
              "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3}
    return {"text_config": text, "vision_config": vision, "projection_dim": cfg.embed_dim,
            "logit_scale_init_value": float(student.logit_scale.detach())}


def _blocks(sd: dict[str, Tensor], src: str, dst: str, n: int) -> dict[str, Tensor]:
    out = {}
    for i in range(n):
        s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[s + f"attn.in_proj_{part}"].chunk(3)
            out.update({d + f"self_attn.q_proj.{part}": q, d + f"self_attn.k_proj.{part}": k,
                        d + f"self_attn.v_proj.{part}": v,
                        d + f"self_attn.out_proj.{part}": sd[s + f"attn.out_proj.{part}"],
                        d + f"layer_norm1.{part}": sd[s + f"ln_1.{part}"], d + f"layer_norm2.{part}": sd[s + f"ln_2.{part}"],
                        d + f"mlp.fc1.{part}": sd[s + f"mlp.c_fc.{part}"], d + f"mlp.fc2.{part}": sd[s + f"mlp.c_proj.{part}"]})
    return out


def hf_state_dict(student: Student) -> dict[str, Tensor]:
    """The ``CLIPModel`` state dict of a ``vit`` student (open_clip names -> HF names)."""
    cfg = student.cfg
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in student.clip.state_dict().items()}
    out = {
        "logit_scale": sd["logit_scale"],
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].T,
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].T,
        **_blocks(sd, "transformer", "text_model", cfg.text_layers),
        **_blocks(sd, "visual.transformer", "vision_model", cfg.vision_layers),
    }
    return {k: v.contiguous() for k, v in out.items()}


def _write_tokenizer(out: Path, context_length: int) -> None:
    """vocab.json / merges.txt of open_clip's CLIP BPE (the same vocabulary as OpenAI CLIP's) and a
    tokenizer config that pads with id 0 ("!") like ``students.tokenizers.clip_tokenize``."""
    tok = clip_tokenizer(context_length)
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (out / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "pad_token": "!",
        "bos_token": "<start_of_text>", "eos_token": "<end_of_text>", "unk_token": "<end_of_text>",
        "do_lower_case": True}, indent=2) + "\n")


def export_hf(student: Student, out_dir: str | Path) -> Path:
    """Write a ``CLIPModel.from_pretrained``-loadable folder for a ``vit`` student."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(**hf_clip_config(student))
    model = CLIPModel(config).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(student), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:  # a layout change in transformers or open_clip
        raise HFExportError(f"CLIPModel layout mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    cfg = student.cfg
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(cfg.mean),
        "image_std": list(cfg.std), "do_convert_rgb": True}, indent=2) + "\n")
    _write_tokenizer(out, cfg.context_length)
    return out


def hf_parity(student: Student, out_dir: str | Path, pixels: Tensor, captions: list[str]) -> dict[str, float]:
    """Worst cosine between the exported ``CLIPModel``'s image / text features (loaded offline from
    ``out_dir``, captions tokenised by the exported ``CLIPTokenizer``) and the student's embeddings."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(out_dir), local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(str(out_dir), local_files_only=True)
    ids = tok(list(captions), padding="max_length", max_length=student.cfg.context_length, truncation=True,
              return_tensors="pt")
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=pixels), model.get_text_features(**ids)
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 returns model outputs
        ref_img, ref_txt = student.encode_image(pixels).embed, student.encode_text(student.tokenize(captions)).embed
    cos = torch.nn.functional.cosine_similarity
    return {"image": float(cos(img.double(), ref_img.double()).min()), "text": float(cos(txt.double(), ref_txt.double()).min())}
