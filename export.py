"""
Carry a tinyllm checkpoint to Hugging Face transformers, to llama.cpp (GGUF) or to llama2.c's run.c.

    python export.py --ckpt output/ckpt.pt --format hf --out hf_model                     # float32
    python export.py --ckpt output/ckpt.pt --format hf --out hf_model --dtype bfloat16
    python export.py --ckpt output/ckpt.pt --format gguf --out model.gguf                  # f32
    python export.py --ckpt output/ckpt.pt --format gguf --out model.gguf --dtype q8_0
    python export.py --ckpt output/ckpt.pt --format llama2c --out model.bin --tokenizer-out tokenizer.bin

--format hf writes a directory that loads offline with
    AutoModelForCausalLM.from_pretrained("hf_model")   # a LlamaForCausalLM
    AutoTokenizer.from_pretrained("hf_model")          # a Llama tokenizer that encodes like our sentencepiece model
                                                       # (transformers 5.x: a text starting with a space gets one
                                                       # '▁' fewer; tokenizer.json itself matches exactly)
(config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer.model, tokenizer_config.json,
special_tokens_map.json). It needs the optional extras: pip install -r requirements-export.txt

--format gguf writes one GGUF file (llama architecture, the sentencepiece tokenizer inside) for llama.cpp and the
tools built on it (llama-cpp-python, Ollama, LM Studio); --dtype f32, f16, bf16 or q8_0 (8-bit, a quarter of f32's
size). It needs the gguf package (llama.cpp's own writer), in the same extras:
    llama-completion -m model.gguf -no-cnv -p "Once upon a time"   # llama.cpp before December 2025: llama-cli
    python -c 'from llama_cpp import Llama; print(Llama("model.gguf")("Once upon a time")["choices"][0]["text"])'

--format llama2c writes run.c's legacy (version 0) float32 model.bin, and with --tokenizer-out run.c's tokenizer.bin:
    ./run model.bin -z tokenizer.bin
run.c hard-codes rope_theta 10000 and norm_eps 1e-5; a model trained with other values gets a warning.
"""

import contextlib
import itertools
import json
import os
import shutil
import struct
import sys
import tempfile

import torch

from configurator import configure, fail  # setting errors: one line, exit code 2
from model import DTYPES, load_model
from preprocess import atomic_write

# -----------------------------------------------------------------------------
ckpt = "output/ckpt.pt"  # a checkpoint written by train.py
format = "hf"  # "hf" (a transformers LlamaForCausalLM directory), "llama2c" (run.c's model.bin), "gguf" (llama.cpp)
out = ""  # hf: the output directory; llama2c: the model.bin path; gguf: the .gguf path
dtype = "float32"  # hf: float32, float16 or bfloat16; gguf: f32, f16, bf16 or q8_0; llama2c: float32 only
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


def adds_dummy_prefix(sp):
    """Whether sentencepiece puts a '▁' before the text (its add_dummy_prefix, on by default)."""
    return sp.encode("a", out_type=str)[0].startswith("▁")


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
    dummy = adds_dummy_prefix(sp)
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
    # build everything in a scratch folder inside the target first (its real path: a symlinked --out on another
    # filesystem, or a parent we cannot write to, still works), then move each file into place: a failure midway
    # leaves an earlier export as it was. One name for it, so that what a killed export left is removed here (a
    # hidden folder would otherwise go along with `hf upload` of the export)
    created = not os.path.isdir(out_dir)
    tmp, done = None, False
    try:
        os.makedirs(out_dir, exist_ok=True)
        tmp = os.path.join(os.path.realpath(out_dir), ".export.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp)
        for name, content in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
        weights = os.path.join(tmp, "model.safetensors")
        safetensors.torch.save_file(hf_state_dict(model, DTYPES[dtype_name]), weights, metadata={"format": "pt"})
        shutil.copymode(os.path.join(tmp, "config.json"), weights)  # safetensors makes it private; match the rest
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        done = True
    except OSError as e:  # name the file in --out, not the scratch folder
        scratch = os.path.dirname(os.fspath(e.filename or ""))
        if e.filename and tmp and scratch == tmp:
            e.filename = os.path.join(out_dir, os.path.basename(os.fspath(e.filename)))
        elif e.filename and scratch == os.path.realpath(out_dir):  # the scratch folder itself
            e.filename = out_dir
        raise
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if created and not done:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty: a failed first export leaves no empty folder behind
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
# llama.cpp (GGUF)

# --dtype for --format gguf: (the ggml type of the 2-D weights, the file type it makes). Norm gains stay float32,
# as llama.cpp's converter keeps every 1-D tensor. The hf spellings (float32, the default, ...) work too.
GGUF_DTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
GGUF_DTYPES.update(float32=GGUF_DTYPES["f32"], float16=GGUF_DTYPES["f16"], bfloat16=GGUF_DTYPES["bf16"])


def gguf_tensors(model):
    """Our weights under llama.cpp's names for its llama architecture, in its order.

    No row permutation for wq/wk: llama.cpp's llama graph rotates interleaved pairs (2i, 2i+1), Meta's layout and
    ours. (Its converter permutes q/k rows only to undo the permutation Hugging Face checkpoints carry; see
    permute_for_hf.) No output.weight: with none, llama.cpp reuses token_embd as the classifier, as our tied model.
    """
    yield "token_embd.weight", model.tok_embeddings.weight
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        yield f"blk.{i}.attn_norm.weight", layer.attention_norm.weight
        yield f"blk.{i}.attn_q.weight", att.wq.weight
        yield f"blk.{i}.attn_k.weight", att.wk.weight
        yield f"blk.{i}.attn_v.weight", att.wv.weight
        yield f"blk.{i}.attn_output.weight", att.wo.weight
        yield f"blk.{i}.ffn_norm.weight", layer.ffn_norm.weight
        yield f"blk.{i}.ffn_gate.weight", ffn.w1.weight
        yield f"blk.{i}.ffn_up.weight", ffn.w3.weight
        yield f"blk.{i}.ffn_down.weight", ffn.w2.weight
    yield "output_norm.weight", model.norm.weight


def gguf_vocab(gguf, sp):
    """Pieces (bytes, '▁' kept: llama.cpp's sentencepiece tokenizer works on them), scores and token types."""
    T = gguf.TokenType
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                     T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    return pieces, scores, types


def export_gguf(model, tok, path, dtype_name):
    try:
        import gguf
    except ImportError:
        fail("--format gguf needs the gguf package: pip install -r requirements-export.txt")
    qtype_name, file_type_name = GGUF_DTYPES[dtype_name]
    qtype = gguf.GGMLQuantizationType[qtype_name]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # GGUFWriter wants a path of its own: it writes a scratch file, which then goes into place through the one
    # atomic writer (an earlier file survives a failure; a symlink is written through)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.realpath(path)), prefix=".gguf") as scratch:
        write_gguf(gguf, model, tok, os.path.join(scratch, "model.gguf"), path, qtype, file_type_name)
    return qtype.name.lower()


def write_gguf(gguf, model, tok, tmp, path, qtype, file_type_name):
    """The GGUF file written to tmp (in a scratch folder), then atomically copied to path."""
    a, sp = model.args, tok.sp
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name("tinyllm")
        w.add_file_type(gguf.LlamaFileType[file_type_name])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(a.vocab_size)
        w.add_context_length(a.max_seq_len)
        w.add_embedding_length(a.dim)
        w.add_feed_forward_length(a.hidden_dim)
        w.add_block_count(a.n_layers)
        w.add_head_count(a.n_heads)
        w.add_head_count_kv(a.n_kv_heads)
        w.add_rope_dimension_count(a.dim // a.n_heads)
        w.add_rope_freq_base(a.rope_theta)
        w.add_layer_norm_rms_eps(a.norm_eps)

        pieces, scores, types = gguf_vocab(gguf, sp)
        w.add_tokenizer_model("llama")  # llama.cpp's sentencepiece tokenizer: merges by piece score, byte fallback
        w.add_tokenizer_pre("default")
        w.add_token_list(pieces)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(tok.bos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_unk_token_id(sp.unk_id())
        w.add_add_bos_token(True)  # a prompt is BOS + its text, as sample.py builds it
        w.add_add_eos_token(False)
        w.add_add_space_prefix(adds_dummy_prefix(sp))

        for name, t in gguf_tensors(model):
            data = t.detach().to(torch.float32).contiguous().numpy()
            q = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
            if q == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[q][0]:
                q = gguf.GGMLQuantizationType.F16  # Q8_0 packs blocks of 32 along a row; as llama.cpp's converter
            packed = gguf.quants.quantize(data, q)
            w.add_tensor(name, packed, raw_dtype=q)  # quantized: uint8 bytes, the shape follows from q

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
    finally:
        w.close()


# -----------------------------------------------------------------------------

def same_file(a, b):
    """Whether paths a and b name one file: the same path after symlinks, or (both existing) a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet)
        return False


def main():
    if format not in ("hf", "llama2c", "gguf"):
        fail(f"unknown --format {format!r}; choose hf (transformers), llama2c (run.c) or gguf (llama.cpp)")
    if not out:
        fail("say where to write: --out DIR for --format hf, --out model.bin for --format llama2c, "
             "--out model.gguf for --format gguf")
    if format != "llama2c" and tokenizer_out:
        fail(f"--tokenizer-out is for --format llama2c; --format {format} puts the tokenizer in "
             f"{'the --out directory' if format == 'hf' else 'the .gguf file'}")
    if format == "hf" and dtype not in DTYPES:
        fail(f"unknown --dtype {dtype!r}; choose float32, float16 or bfloat16")
    if format == "llama2c" and dtype != "float32":
        fail("llama2.c's version-0 model.bin is float32 only; drop --dtype")
    if format == "gguf" and dtype not in GGUF_DTYPES:
        fail(f"unknown --dtype {dtype!r} for --format gguf; choose f32, f16, bf16 or q8_0")
    if tokenizer_out and same_file(out, tokenizer_out):
        fail(f"--out and --tokenizer-out are the same file ({out}); the tokenizer would replace the model: give "
             "each its own path, e.g. --out model.bin --tokenizer-out tokenizer.bin")
    for flag, path in (("--out", out if format != "hf" else ""), ("--tokenizer-out", tokenizer_out)):
        for source_flag, source in (("--ckpt", ckpt), ("--tokenizer", tokenizer)):
            if path and source and same_file(path, source):
                # the export reads it, then would replace it: the checkpoint (or tokenizer) would be lost
                fail(f"{flag} {path} is the {source_flag} file itself; writing there would destroy it: give "
                     f"{flag} another path")
        if path and os.path.isdir(path):
            name = "tokenizer.bin" if flag == "--tokenizer-out" else "model.gguf" if format == "gguf" else "model.bin"
            fail(f"{flag} {path} is a directory; --format {format} writes a file there, e.g. {flag} "
                 f"{os.path.join(path, name)}")
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
    if format == "gguf":
        written = export_gguf(model, tok, out, dtype)
        print(f"wrote {out} ({os.path.getsize(out):,} bytes, GGUF, {written}); run: llama-completion -m {out} "
              '-p "Once upon a time"')
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
    except KeyboardInterrupt:  # Ctrl-C: every file is replaced only once it is complete, scratch files are removed
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full disk, a read-only folder: every file is replaced only once it is complete
        raise SystemExit(f"error: could not write {e.filename or out} ({e.strerror or e}); nothing there was "
                         "replaced") from None
