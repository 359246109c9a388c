# The CPU quickstart: a ~2M-parameter model on the default Shakespeare corpus, trained in about 3 minutes on
# 2 CPU cores to readable (if odd) Shakespeare. Its data (download, tokenizer, shards) is prepared on first run.
#   python train.py configs/tiny.py
out_dir = "output"
dataset = "shakespeare"
vocab_size = 2048
max_seq_len = 128
dim = 192
n_layers = 4
n_heads = 6
n_kv_heads = 2
multiple_of = 32
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 3e-3
min_lr = 3e-4
weight_decay = 0.1
warmup_iters = 50
max_iters = 1500
lr_schedule = "cosine"
eval_interval = 500
eval_iters = 20
log_interval = 50
