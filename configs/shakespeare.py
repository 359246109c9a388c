# Shakespeare on one GPU: a ~20M-parameter model, about 5 minutes on an H100 (bf16, compiled).
#   python train.py configs/shakespeare.py
out_dir = "output/shakespeare"
dataset = "shakespeare"
vocab_size = 4096
max_seq_len = 512
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 4
dropout = 0.1  # Shakespeare is only ~1.5M tokens: a model this size overfits without it
batch_size = 32
gradient_accumulation_steps = 2
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
max_iters = 5000
eval_interval = 500
eval_iters = 50
log_interval = 50
