"""Train CODER on MSCOCO (SCAN precomp features).

Every variable below is a hyperparameter; override any of them from the command line:
    python train_coco.py --data_path data/coco_precomp --text_encoder bert --bert_path DIR
    python train_coco.py --demo          # synthetic data, a couple of minutes on a CPU
    python train_coco.py --resume runs/coco_.../last.pt
Multi-GPU: torchrun --nproc_per_node 4 train_coco.py ... (batch_size is the global batch).
"""

import sys

# data
data_path = "data/coco_precomp"  # {split}_ims.npy, {split}_caps.txt (SCAN layout; train = train + restval)
vocab_path = "data/vocab/coco_precomp_vocab.json"  # SCAN JSON vocabulary (bigru text encoder)
concept_path = "data/cvse_concepts/coco"  # CVSE concept folder, or one built by concepts.py
train_split = "train"
val_split = "dev"
val_max_images = 1000  # SCAN-family code validates on the first 1,000 dev images
test_split = "testall"  # evaluated with best.pt after training ("" to skip)
# model (docs/method.md; [R] = our reconstruction of a part the paper's abstract names)
embed_dim = 1024
image_pooling = "attn"  # attn | mean | gpo
text_pooling = "attn"  # attn | mean | gpo ([R] for bert)
batch_norm = True  # False: no BatchNorm anywhere
text_encoder = "bigru"  # bigru | bert
word_dim = 300
word_vectors = ""  # GloVe text file, "glove-package", or "" (random init)
bert_path = "bert-base-uncased"  # hub name or a local directory
bert_length_groups = 1  # BERT over N groups of similar-length captions (same outputs up to dropout; faster on CPU)
bert_frozen_layers = 0  # BERT's embeddings and first N layers frozen, no dropout (0: fine-tune all)
text_state_cache = "auto"  # frozen layers' outputs computed once: auto (data_path/text_states) | off | a folder
l2norm_before_pooling = False  # L2-normalise each region / token feature before pooling (CVSE)
concept_branch = True
concept_threshold = 0.3  # CVSE graph binarisation threshold
gcn_hidden = 512
momentum_gcn = True  # [R] concept keys from a momentum copy of the GCN
concept_score_scale = 10.0
# [R] detach (concept losses stay out of the encoders) | bn (CVSE) | no_bn; see docs/coder_parts.md
concept_query_input = "detach"
label_mix_ratio = 0.4  # r: caption's own concept labels mixed into its query
momentum = 0.995  # [R] key-encoder EMA
queue_size = 8192  # [R] entries per dynamic dictionary (0: in-batch only)
num_prototypes = 1000  # [R] online clustering
sinkhorn_epsilon = 0.05
sinkhorn_iterations = 3
sinkhorn_with_queue = True  # [R] Sinkhorn over batch + queue, keep the batch rows
prototype_momentum = 0.99  # [R]
prototype_init = "random"  # [R] random | keys (drawn from the first K_p momentum keys)
prototype_update = "ema"  # [R] ema (prototype_momentum) | learned (trained by the pseudo-label loss)
loss = "dcl"  # dcl | triplet (VSE++ baseline)
tau = 0.05
beta = 2.0  # [R] DCL weights ∝ exp(beta·s) (0: momentum InfoNCE; --preset spec: 10)
beta_warmup_epochs = 0  # [R] beta grows linearly from 0 over the first N epochs
beta_adaptive = False  # [R] beta divided by the batch's spread of negative similarities
dcl_weight_groups = "joint"  # [R] joint | separate (batch keys and queue weighted apart)
false_negative_threshold = 0.0  # [R] drop negatives whose key is more similar than this to the positive's key (0: off)
margin = 0.2  # triplet baseline only
triplet_all_negatives_epochs = 0  # triplet: first N epochs over all in-batch negatives (VSE∞ warm-up), then the hardest
region_drop = 0.0  # training: drop each region from the pooling with this probability (VSE∞: 0.2)
lambda_concept = 1.0  # [R]
lambda_pseudo = 1.0  # [R]
lambda_fused = 0.0  # the loss (dcl or triplet) on the fused similarity (CVSE: 3 against instance 5); 0 = off
lambda_kl = 0.0  # KL(caption || image) of the concept scores (CVSE: 2 against instance 5); 0 = off
pseudo_label_loss = True
tau_pseudo = 0.1  # [R]
mu = 0.15  # [R] concept-branch weight in the similarity
fusion = "concat"  # concat: (1-mu)s + mu s_c | weighted_sum: cosine of l2norm((1-mu)x + mu x_c) (CVSE)
# optimisation (docs/method.md#the-training-step)
epochs = 25
batch_size = 128  # global batch over all processes
lr = 2e-4
bert_lr_scale = 0.1
weight_decay = 1e-4
warmup_epochs = 1
lr_decay_epoch = 15
lr_decay_factor = 0.1
grad_clip = 2.0
grad_clip_scope = "branch"  # branch: instance encoders and concept branch clipped apart | global (--preset spec)
freeze_bert_epochs = 0
# system
seed = 0
device = "auto"  # auto | cuda | cpu
amp = "auto"  # auto: bf16 on CUDA where supported, else fp16 + GradScaler; off on CPU | bf16 | fp16 | off
tf32 = True  # TF32 matmuls/convolutions on CUDA (Ampere and newer)
compile = False  # torch.compile the training forward
dist_timeout = 60.0  # minutes a process waits at a collective (others wait while rank 0 validates)
workers = 4
eval_batch_size = 256
log_every = 50
diag_every = 200  # per-term gradient norms on the encoders every N steps (0: off)
val_every_steps = 0  # extra validations within an epoch (0: once per epoch)
checkpoint_every_steps = 1000  # step checkpoints (last.pt) for exact resume
progress = True
run_dir = ""  # default: runs/coco_<timestamp>
overwrite = False
resume = ""

if __name__ == "__main__":
    from options import script_config
    from trainer import run
    from utils import cli_entry

    config = script_config(dict(globals()))
    cli_entry(run)(config, sys.argv[1:], "coco")
