# Shakespeare on one GPU: a 25M-parameter model (dim 512, 8 layers, 4096-token vocab, context 512), about two
# minutes on an H100 (bf16, compiled; ~31 ms/iteration): val ~1.60 bits/byte. Shakespeare is only ~1.5M tokens,
# so a model this size starts to overfit after ~10 epochs (500 iterations): dropout helps, the schedule ends
# there, and best.pt keeps the checkpoint with the lowest val loss.
#   python train.py configs/shakespeare.py
out_dir = "output/shakespeare"
data_source = "shakespeare"
vocab_size = 4096
max_seq_len = 512
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 4
dropout = 0.1
batch_size = 32
gradient_accumulation_steps = 2
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
max_iters = 600
eval_interval = 100
eval_iters = 50
log_interval = 25
keep_best = True
