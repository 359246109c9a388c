"""
Sample text from a trained tinyllm checkpoint; the text streams to stdout as it is generated.

    python sample.py --ckpt output/ckpt.pt
    python sample.py --ckpt output/ckpt.pt --start "Once upon a time" --num_samples=3 --temperature=0.8
    python sample.py --ckpt output/ckpt.pt --start FILE:prompt.txt --temperature=0     # greedy
    python sample.py --ckpt output/ckpt.pt --top_k=0 --top_p=0.9 --max_new_tokens=500

The tokenizer travels inside the checkpoint; --tokenizer=path.model overrides it (its vocab size must match the
model's). Each sample is BOS + the prompt, continued until EOS or max_new_tokens, using the model's KV cache (on
CUDA, one captured CUDA graph replayed per token). The num_samples samples run together as one batch: the first
streams, the others are printed whole when it ends, separated by a line of dashes. tokens/s (after the first
token) and the warm-up before the first token go to stderr at the end.
"""

import os
import sys
import time

import torch

from configurator import configure, fail as setting_error  # exit code 2
from model import autocast_ctx, load_model, pick_device, pick_dtype

# -----------------------------------------------------------------------------
ckpt = "output/ckpt.pt"  # a checkpoint written by train.py
start = ""  # the prompt: text, or FILE:path to read it from a file; "" starts from BOS alone
num_samples = 1
max_new_tokens = 256
temperature = 0.8  # 0: greedy (always the likeliest token)
top_k = 200  # sample among the k likeliest tokens only; 0: no limit
top_p = 1.0  # nucleus sampling: only the likeliest tokens whose probabilities add up to top_p; 1.0: off
seed = 1337
device = "auto"  # "auto" (cuda, mps, cpu in that order), "cpu", "cuda", "cuda:1", "mps"
dtype = "auto"  # "auto" (bfloat16 where supported, float16 on older GPUs, float32 on CPU), or explicit
tokenizer = ""  # a sentencepiece .model to use instead of the one stored in the checkpoint
# -----------------------------------------------------------------------------


def fail(message):
    raise SystemExit(f"error: {message}")


def read_prompt(start):
    """The prompt text: start itself, or the contents of the file named by FILE:path."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        fail(f"cannot read the prompt file {path} ({e.strerror}); give an existing file as --start=FILE:path")
    except UnicodeDecodeError:
        fail(f"the prompt file {path} is not UTF-8 text")
    # editors end files with a newline the user did not mean as part of the prompt
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def prompt_ids(tok, text, max_seq_len):
    """BOS + the encoded prompt, cropped to its last max_seq_len tokens (with a warning) if longer."""
    ids = tok.encode(text, bos=True)
    if len(ids) > max_seq_len:
        print(f"warning: the prompt is {len(ids)} tokens, longer than the model's context of {max_seq_len}; "
              f"keeping its last {max_seq_len} tokens", file=sys.stderr)
        ids = ids[-max_seq_len:]
    return ids


class TextStream:
    """Text for a growing list of token ids, in printable pieces as the ids arrive.

    Decoding each new token alone would be wrong: sentencepiece drops the leading space of the first piece it
    decodes, and byte-fallback tokens (<0xE2> <0x80> <0x99>) make a character only together. So each step decodes
    a short window ending at the newest token and prints what the newest tokens add to the window's text; text
    ending in an unfinished UTF-8 sequence (decoded as U+FFFD) waits until the sequence completes.
    """

    def __init__(self, tok, ids):
        self.tok = tok
        self.ids = list(ids)
        self.prefix = 0  # the window starts here: tokens already printed, decoded for context
        self.read = 0  # tokens before this were printed

    def add(self, token_id):
        self.ids.append(token_id)
        return self.take()

    def take(self, final=False):
        """The text not printed yet ('' while a multi-byte character is incomplete, unless final)."""
        seen = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") and not final:
            return ""
        if not text.startswith(seen):  # not expected with sentencepiece; print what differs rather than nothing
            seen = os.path.commonprefix([seen, text])
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]


def stream_sample(model, tok, ids, write, max_new_tokens, temperature=1.0, top_k=None, top_p=None, num_samples=1):
    """Continue the prompt ids num_samples times, as one batch. The first sample streams: write(text) gets the
    prompt and then each new piece of its text as soon as it is sampled. Returns each sample's new token ids (a
    list per sample, ending with EOS when the model produced it) and the time.perf_counter() at which the first
    new tokens arrived: what came before (setup, CUDA graph capture, the prompt's prefill) is warm-up."""
    stream = TextStream(tok, ids)
    write(stream.take())
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=model.tok_embeddings.weight.device)
    new, first_at = [[] for _ in range(num_samples)], None
    for column in model.generate_stream(idx, max_new_tokens, temperature, top_k or None, top_p, eos_id=tok.eos_id):
        column = column.tolist()
        first_at = first_at or time.perf_counter()
        for sample_ids, token_id in zip(new, column):
            if not sample_ids or sample_ids[-1] != tok.eos_id:  # a finished sample is padded with EOS: not its own
                sample_ids.append(token_id)
                if sample_ids is new[0] and token_id != tok.eos_id:
                    write(stream.add(token_id))
    write(stream.take(final=True))
    return new, first_at


class StdoutFailed(Exception):
    """Writing the sample to stdout failed (a full disk, /dev/full), as opposed to the reader going away."""


def write_stdout(text):
    if text:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()  # show each token as it comes, even through a pipe
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutFailed(f"could not write the sample to stdout ({e.strerror or e})") from None


def main():
    if num_samples < 1 or max_new_tokens < 1:
        setting_error("--num_samples and --max_new_tokens must be >= 1")
    if temperature < 0:
        setting_error(f"--temperature must be >= 0 (0 is greedy), not {temperature}")
    if top_k < 0:
        setting_error(f"--top_k must be >= 0 (0 turns it off), not {top_k}")
    if not 0.0 < top_p <= 1.0:
        setting_error(f"--top_p must be in (0, 1] (1.0 turns it off), not {top_p}")
    text = read_prompt(start)
    dev = pick_device(device)
    dtype_name = pick_dtype(dtype, dev)
    model, tok, ck = load_model(ckpt, tokenizer)
    model.to(dev)
    ids = prompt_ids(tok, text, model.args.max_seq_len)
    torch.manual_seed(seed)
    print(f"{ckpt}: iteration {ck.get('iter_num', '?')}, {model.num_params() / 1e6:.1f}M parameters, "
          f"on {dev} in {dtype_name}", file=sys.stderr)

    t0 = time.perf_counter()
    with autocast_ctx(dev, dtype_name):
        samples, first_at = stream_sample(model, tok, ids, write_stdout, max_new_tokens, temperature, top_k, top_p,
                                          num_samples)
    end = time.perf_counter()
    for i, new in enumerate(samples):
        if i:  # the other samples were generated alongside the first, which streamed: print them whole
            write_stdout("-" * 40 + "\n" + tok.decode(ids + [t for t in new if t != tok.eos_id]))
        write_stdout("\n")
    # tokens/s counts the tokens after the first step: before it come setup, CUDA graph capture and the prefill
    n_tokens, total, warm_up = sum(map(len, samples)), end - t0, first_at - t0
    batch = f", {num_samples} samples in one batch" if num_samples > 1 else ""
    rate = (f": {(n_tokens - num_samples) / (end - first_at):.1f} tokens/s after the first step"
            if n_tokens > num_samples else "")
    print(f"{n_tokens} tokens in {total:.2f} s{batch}{rate} (warm-up to the first token: {warm_up:.2f} s)",
          file=sys.stderr)


if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):
        # a character the output encoding lacks (cp1252 when Windows redirects, the U+FFFD of a partial UTF-8
        # sequence) becomes '?', not a UnicodeEncodeError
        sys.stdout.reconfigure(errors="replace")
    configure(globals(), sys.argv[1:])
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader went away (sample.py | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except StdoutFailed as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # drop what is buffered: no retry at exit
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
