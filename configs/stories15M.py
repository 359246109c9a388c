# llama2.c's stories15M shape on TinyStories (dim 288, 6 layers, 6 heads, context 256, 32000-token vocab).
# About 131K tokens per iteration; a few hours on one modern GPU for a well-trained model.
# Prepare the data first (needs internet, ~1.5 GB):
#   python preprocess.py download tinystories
#   python preprocess.py train_vocab --vocab_size=32000 --input data/raw/tinystories --data_dir data/tinystories
#   python preprocess.py pretokenize --vocab_size=32000 --input data/raw/tinystories --data_dir data/tinystories
#   python train.py configs/stories15M.py      (or torchrun --standalone --nproc_per_node=N train.py ...)
out_dir = "output/stories15M"
data_source = "tinystories"
data_dir = "data/tinystories"
vocab_size = 32000
max_seq_len = 256
dim = 288
n_layers = 6
n_heads = 6
n_kv_heads = 6
batch_size = 128
gradient_accumulation_steps = 4
learning_rate = 5e-4
warmup_iters = 1000
max_iters = 100000
eval_interval = 2000
log_interval = 10
