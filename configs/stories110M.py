# llama2.c's stories110M shape on TinyStories (dim 768, 12 layers, 12 heads, context 1024, 32000-token vocab).
# About 524K tokens per iteration; several GPU-days on one card, meant for torchrun on a node of 8:
# Prepare the data as described in configs/stories15M.py, then:
#   torchrun --standalone --nproc_per_node=8 train.py configs/stories110M.py
out_dir = "output/stories110M"
data_source = "tinystories"
data_dir = "data/tinystories"
vocab_size = 32000
max_seq_len = 1024
dim = 768
n_layers = 12
n_heads = 12
n_kv_heads = 12
batch_size = 32
gradient_accumulation_steps = 16
learning_rate = 3e-4
warmup_iters = 1000
max_iters = 200000
eval_interval = 2000
log_interval = 10
