"""
Carry a tinyllm checkpoint to Hugging Face transformers or to llama2.c's run.c.

    python export.py --ckpt output/ckpt.pt --format hf --out hf_model                     # float32
    python export.py --ckpt output/ckpt.pt --format hf --out hf_model --dtype bfloat16
    python export.py --ckpt output/ckpt.pt --format llama2c --out model.bin --tokenizer-out tokenizer.bin

--format hf writes a directory that loads offline with
    AutoModelForCausalLM.from_pretrained("hf_model")   # a LlamaForCausalLM
    AutoTokenizer.from_pretrained("hf_model")          # a Llama tokenizer that encodes like our sentencepiece model
(config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer.model, tokenizer_config.json,
special_tokens_map.json). It needs the optional extras: pip install -r requirements-export.txt

--format llama2c writes run.c's legacy (version 0) float32 model.bin, and with --tokenizer-out run.c's tokenizer.bin:
    ./run model.bin -z tokenizer.bin
run.c hard-codes rope_theta 10000 and norm_eps 1e-5; a model trained with other values gets a warning.
"""

import itertools
import json
import os
import shutil
import struct
import sys

import torch

from configurator import configure, fail  # setting errors: one line, exit code 2
from model import DTYPES
from preprocess import atomic_write
from sample import load_model

# -----------------------------------------------------------------------------
ckpt = "output/ckpt.pt"  # a checkpoint written by train.py
format = "hf"  # "hf" (a transformers LlamaForCausalLM directory) or "llama2c" (run.c's model.bin)
out = ""  # hf: the output directory; llama2c: the model.bin path
dtype = "float32"  # hf only: float32, float16 or bfloat16 (llama2c's version-0 format is float32)
tokenizer = ""  # a sentencepiece .model to export instead of the checkpoint's own (must match the vocab size)
tokenizer_out = ""  # llama2c only: also write run.c's tokenizer.bin here
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# Hugging Face transformers

def permute_for_hf(w, n_heads):
    """Rows of wq/wk from Meta's rotary layout to HF's.

    Meta (and tinyllm) rotate interleaved pairs (2i, 2i+1) of each head; HF's rotate_half pairs (i, i + head_dim/2).
    Reordering each head's rows as all even rows, then all odd rows makes HF rotate the same pairs.
    """
    rows, dim = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def hf_state_dict(model, torch_dtype):
    """Our weights under LlamaForCausalLM's names. lm_head is left out: tie_word_embeddings makes it embed_tokens."""
    a = model.args
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        att, ffn = layer.attention, layer.feed_forward
        sd[p + "self_attn.q_proj.weight"] = permute_for_hf(att.wq.weight, a.n_heads)
        sd[p + "self_attn.k_proj.weight"] = permute_for_hf(att.wk.weight, a.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = att.wv.weight
        sd[p + "self_attn.o_proj.weight"] = att.wo.weight
        sd[p + "mlp.gate_proj.weight"] = ffn.w1.weight
        sd[p + "mlp.down_proj.weight"] = ffn.w2.weight
        sd[p + "mlp.up_proj.weight"] = ffn.w3.weight
        sd[p + "input_layernorm.weight"] = layer.attention_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.ffn_norm.weight
    # safetensors wants each tensor contiguous and owning no shared storage
    return {k: v.detach().to(torch_dtype).contiguous().clone() for k, v in sd.items()}


def hf_config(model, tok, dtype_name):
    """config.json as the installed transformers writes it, plus the older spellings of two keys."""
    from transformers import LlamaConfig
    a = model.args
    config = LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=a.vocab_size, hidden_size=a.dim,
        intermediate_size=a.hidden_dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads, max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
        rope_theta=a.rope_theta, hidden_act="silu", tie_word_embeddings=True, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, torch_dtype=dtype_name)
    d = config.to_dict()
    # transformers 5 nests rope_theta in rope_parameters and renamed torch_dtype to dtype; 4.x and tools such as
    # llama.cpp's converter read the flat keys, which 5 accepts too
    d["rope_theta"] = a.rope_theta
    d["torch_dtype"] = dtype_name
    return d


def hf_generation_config(tok):
    # no pad token in our vocabulary: padding with eos is what generate() would pick, minus its warning
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}


def bpe_merges(sp):
    """The merge list a BPE tokenizer needs to segment like this sentencepiece BPE model.

    sentencepiece BPE repeatedly joins the adjacent pair whose joined piece scores highest; a merge-list BPE joins
    the pair that comes first in the list. So every way to split each piece into two pieces of the vocabulary
    becomes a merge, ranked by the joined piece's score.
    """
    normal = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []
    for piece, i in sorted(normal.items(), key=lambda kv: (-sp.get_score(kv[1]), kv[1])):
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in normal and piece[j:] in normal]
        merges += sorted(splits, key=lambda lr: (normal[lr[0]], normal[lr[1]]))
    return merges


def hf_tokenizer_json(sp, tok):
    """tokenizer.json for a Llama tokenizer: loads with no sentencepiece or protobuf at the user's end."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    unk = sp.id_to_piece(sp.unk_id())
    bpe = models.BPE(vocab=vocab, merges=bpe_merges(sp), unk_token=unk, fuse_unk=True, byte_fallback=True)
    t = Tokenizer(bpe)
    specials = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    t.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in specials])
    # as sentencepiece: spaces become '▁', and its "dummy prefix" puts one more '▁' before the text, so a first
    # word looks like a word after a space. (A Metaspace pre-tokenizer would skip that '▁' for text that starts
    # with a space, so " hi" would not encode as sentencepiece does.)
    dummy = sp.encode("a", out_type=str)[0].startswith("▁")
    t.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if dummy else [])
                                        + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    t.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if dummy else []))
    bos = sp.id_to_piece(tok.bos_id)
    t.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                     special_tokens=[(bos, tok.bos_id)])
    return t, dummy


def hf_tokenizer_files(sp, tok, max_len):
    t, dummy = hf_tokenizer_json(sp, tok)
    piece = sp.id_to_piece
    special = {"bos_token": piece(tok.bos_id), "eos_token": piece(tok.eos_id), "unk_token": piece(sp.unk_id())}
    added = {str(i): {"content": piece(i), "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)}
    config = {
        # 4.x loads tokenizer.json as it is (as LlamaTokenizerFast). 5.x rebuilds a LlamaTokenizer from its vocab and
        # merges around a Metaspace pre-tokenizer: the same ids, except that text starting with a space gets one
        # '▁' fewer than sentencepiece gives it
        "tokenizer_class": "LlamaTokenizer",
        **special, "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,  # as our prompts: BOS, then the text
        "legacy": False, "add_prefix_space": None if dummy else False,
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": max_len, "added_tokens_decoder": added,
    }
    if config["add_prefix_space"] is None:
        del config["add_prefix_space"]  # set at all, it makes 4.x rebuild from tokenizer.model (needs protobuf)
    return {
        "tokenizer.json": t.to_str(pretty=True),
        "tokenizer.model": tok.model_bytes,  # for sentencepiece users and transformers' slow tokenizer
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def export_hf(model, tok, out_dir, dtype_name):
    try:
        import safetensors.torch
        import tokenizers  # noqa: F401 (comes with transformers)
        import transformers  # noqa: F401
    except ImportError as e:
        fail(f"--format hf needs transformers and safetensors ({e.name or 'one'} is missing): "
             "pip install -r requirements-export.txt")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f"--out {out_dir} is a file; --format hf writes a directory, give a new or existing directory")
    files = {
        "config.json": json.dumps(hf_config(model, tok, dtype_name), indent=2),
        "generation_config.json": json.dumps(hf_generation_config(tok), indent=2),
        **hf_tokenizer_files(tok.sp, tok, model.args.max_seq_len),
    }
    # build everything beside the target first: a failure midway leaves an earlier export as it was
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp)
    try:
        for name, content in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        weights = os.path.join(tmp, "model.safetensors")
        safetensors.torch.save_file(hf_state_dict(model, DTYPES[dtype_name]), weights, metadata={"format": "pt"})
        shutil.copymode(os.path.join(tmp, "config.json"), weights)  # safetensors makes it private; match the rest
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(["model.safetensors", *files])


# -----------------------------------------------------------------------------
# llama2.c

def llama2c_tensors(model):
    """run.c's legacy (version 0) layout: each kind of weight for all layers together, in this order."""
    a = model.args
    yield model.tok_embeddings.weight
    for name in ("attention_norm", "attention.wq", "attention.wk", "attention.wv", "attention.wo", "ffn_norm",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"):
        for layer in model.layers:
            yield layer.get_submodule(name).weight
    yield model.norm.weight
    # the rotary cos/sin tables (run.c skips them now, but the format keeps their place)
    yield model.rope_cos[:a.max_seq_len]
    yield model.rope_sin[:a.max_seq_len]
    # no classifier: the output matrix is the embedding, which a positive vocab_size in the header says


def export_llama2c(model, path):
    a = model.args
    # header: 7 int32; vocab_size positive = the classifier shares the embedding matrix
    header = struct.pack("<7i", a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size,
                         a.max_seq_len)
    # little-endian float32, row-major: what run.c mmaps (one tensor at a time, never the whole file in memory)
    tensors = (t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
               for t in llama2c_tensors(model))
    write_file_atomic(path, itertools.chain([header], tensors))


def llama2c_tokenizer_bytes(tok):
    """run.c's tokenizer.bin: int32 max_token_length, then per id: float32 score, int32 length, the piece's bytes.

    As llama2.c writes it: sentencepiece's '▁' becomes a plain space; BOS and EOS become '\\n<s>\\n' and
    '\\n</s>\\n'; byte-fallback pieces stay spelled '<0xAB>', which run.c decodes to the byte itself.
    """
    sp = tok.sp
    pieces, scores = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if i == tok.bos_id:
            piece = "\n<s>\n"
        elif i == tok.eos_id:
            piece = "\n</s>\n"
        pieces.append(piece.replace("▁", " ").encode("utf-8"))
        scores.append(sp.get_score(i))
    chunks = [struct.pack("<i", max(len(p) for p in pieces))]
    for piece, score in zip(pieces, scores):
        chunks.append(struct.pack("<fi", score, len(piece)) + piece)
    return b"".join(chunks)


def write_file_atomic(path, chunks):
    """Write the byte strings in chunks to path through preprocess.atomic_write: on any failure an earlier file there
    stays as it was, and no partial file is left."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.writelines(chunks))


# -----------------------------------------------------------------------------

def main():
    if format not in ("hf", "llama2c"):
        fail(f"unknown --format {format!r}; choose hf (transformers) or llama2c (run.c)")
    if not out:
        fail("say where to write: --out DIR for --format hf, --out model.bin for --format llama2c")
    if format == "hf" and tokenizer_out:
        fail("--tokenizer-out is for --format llama2c; --format hf puts the tokenizer in the --out directory")
    if format == "hf" and dtype not in DTYPES:
        fail(f"unknown --dtype {dtype!r}; choose float32, float16 or bfloat16")
    if format == "llama2c" and dtype != "float32":
        fail("llama2.c's version-0 model.bin is float32 only; drop --dtype")
    for flag, path in (("--out", out if format == "llama2c" else ""), ("--tokenizer-out", tokenizer_out)):
        if path and os.path.isdir(path):
            fail(f"{flag} {path} is a directory; --format llama2c writes a file there, e.g. {flag} "
                 f"{os.path.join(path, 'model.bin' if flag == '--out' else 'tokenizer.bin')}")
        if path and os.path.exists(path) and not os.path.isfile(path):
            # a device, pipe or socket (or a symlink to one): never replaced by a file. A symlink to a regular
            # file is written through to its target.
            fail(f"{flag} {path} exists and is not a regular file; export.py writes only files: give "
                 "another path")
    model, tok, _ = load_model(ckpt, tokenizer)
    if format == "hf":
        written = export_hf(model, tok, out, dtype)
        print(f"wrote {out}/ ({', '.join(written)}), {dtype}")
        return
    a = model.args
    if a.rope_theta != 10000.0 or a.norm_eps != 1e-5:
        print(f"warning: run.c assumes rope_theta=10000 and norm_eps=1e-5, this model has rope_theta={a.rope_theta:g} "
              f"and norm_eps={a.norm_eps:g}: its output in run.c will be off", file=sys.stderr)
    export_llama2c(model, out)
    print(f"wrote {out} ({os.path.getsize(out):,} bytes, llama2.c version 0, float32)")
    if tokenizer_out:
        write_file_atomic(tokenizer_out, [llama2c_tokenizer_bytes(tok)])
        print(f"wrote {tokenizer_out} ({tok.vocab_size} pieces); run: ./run {out} -z {tokenizer_out}")


if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
    try:
        main()
    except OSError as e:  # a full disk, a read-only folder: every file is replaced only once it is complete
        raise SystemExit(f"error: could not write {e.filename or out} ({e.strerror or e}); nothing there was "
                         "replaced") from None
