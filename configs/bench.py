# Time to quality on one GPU: the seed shape (8.5M parameters) trained as fast as it learns, measured from process
# start, on a ~16 MB jsonl corpus of English prose (the figures in README.md's "Time to quality" come from one of
# public-domain books, 4.8M tokens). Make the shards (vocab 4096, 2.5% held out for val), then train:
#   python preprocess.py train_vocab --vocab_size=4096 --input TRAIN.jsonl VAL.jsonl --data_dir data/bench
#   python preprocess.py pretokenize --vocab_size=4096 --input TRAIN.jsonl VAL.jsonl --data_dir data/bench --val_fraction 0.025
#   python train.py configs/bench.py
# What the recipe is and why (issue 13; measured on one H200, see README "Time to quality"):
# - Muon for the hidden matrices: it learns more per token than AdamW (val 3.34 vs 3.45 at llama2.c's 3000 steps).
# - one step of 192 x 256 tokens (49K) through the CUDA graph: 19.3 ms, ~2.5M tokens/s (128 x 256: 13.9 ms,
#   2.4M), and with Muon lr 0.03 (0.02 reaches 3.46 a few steps sooner) it ends lower: 3.231-3.234 over 3 seeds
#   where 128 x 256 with lr 0.02 ended at 3.246.
# - ~20 epochs of a 4.8M-token corpus: without regularisation val loss turns up after ~13 epochs (best 3.38);
#   dropout 0.1 and weight decay 0.3 keep it falling to ~3.23 at 98M tokens (2000 steps).
# - one cosine to 0 over those 2000 steps, short warmup; evaluation every 125 steps on 960 val windows.
out_dir = "out/bench"
data_source = "custom"
data_dir = "data/bench"
vocab_size = 4096
max_seq_len = 256
dim = 288
n_layers = 8
n_heads = 8
n_kv_heads = 4
dropout = 0.1
optimizer = "muon"
muon_lr = 0.03
learning_rate = 6e-3  # AdamW, for the embeddings and norm gains
weight_decay = 0.3
batch_size = 192
gradient_accumulation_steps = 1
max_iters = 2000
lr_schedule = "cosine"
warmup_iters = 33
min_lr = 0.0
eval_interval = 125
eval_iters = 5  # x 192 = 960 val windows
log_interval = 250
keep_best = False
