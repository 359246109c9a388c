# llama2.c's stories42M shape on TinyStories (dim 512, 8 layers, 8 heads, context 1024, 32000-token vocab).
# About 262K tokens per iteration; most of a day on one modern GPU, proportionally less with torchrun.
# Prepare the data as described in configs/stories15M.py, then:
#   python train.py configs/stories42M.py
out_dir = "output/stories42M"
data_source = "tinystories"
data_dir = "data/tinystories"
vocab_size = 32000
max_seq_len = 1024
dim = 512
n_layers = 8
n_heads = 8
n_kv_heads = 8
batch_size = 32
gradient_accumulation_steps = 8
learning_rate = 5e-4
warmup_iters = 1000
max_iters = 100000
eval_interval = 2000
log_interval = 10
