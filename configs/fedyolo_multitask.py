"""FedYolo multi-task: one frozen pretrained backbone, a LoRA module set and
a head per task (Zhang et al. 2023, arXiv 2307.04905).

Split digits: task 0 = digits 0-4, task 1 = digits 5-9 (each relabelled
0-4), 50 training clients per task (Dirichlet 0.5 within the task). Every
round samples 10 clients from both tasks; a client trains only its task's
LoRA (rank 4 on the attention query/value kernels) and head, with the
backbone frozen: its upload and download are those leaves only (after the
one-time backbone download, `initial_download_bits` in summary.json). The
server averages each task's modules over that task's clients, so task 0's
model never changes when task 1 trains. Evaluation per task
(`task{t}/test_accuracy`; `test_accuracy` is their mean).

Start from the pretrained backbone (`configs/fedyolo_backbone.py`):

  python launch/pretrain.py --config=configs/fedyolo_backbone.py \\
      --workdir=runs/fedyolo_backbone
  python launch/train.py --config=configs/fedyolo_multitask.py \\
      --workdir=runs/fedyolo --config.init_checkpoint=runs/fedyolo_backbone

(the backbone's own head is not loaded: `init_checkpoint_skip='^head'`; each
task's head starts fresh). Other modules: `--config.techniques[0].kinds=
adapter --config.model.kwargs.adapter_dim=16`, `kinds=prompt` with
`prompt_len=8`, `kinds=` (head only), `--config.techniques[0].full=True`
(full fine-tuning of the shared backbone, the forgetting baseline);
`--config.mode=local` trains every client alone (no server).
"""

import ml_collections

from fedjax_eff.experiment.defaults import sibling_config


def get_config():
  c = sibling_config(__file__, 'fedyolo_backbone')
  c.num_rounds = 60
  c.clients_per_round = 10
  c.data.classes = []
  c.data.num_clients, c.data.heldout_clients = 50, 5
  c.data.tasks = [ml_collections.ConfigDict(dict(classes=[0, 1, 2, 3, 4])),
                  ml_collections.ConfigDict(dict(classes=[5, 6, 7, 8, 9]))]
  c.model.kwargs.lora_rank = 4
  c.model.kwargs.lora_targets = 'attn/(query|value)'
  c.model.kwargs.adapter_dim = 0
  c.model.kwargs.prompt_len = 0
  c.techniques = [ml_collections.ConfigDict(dict(
      name='modules', kinds='lora', train_head=True, full=False))]
  c.client.optimizer = 'adam'
  c.client.learning_rate = 3e-3
  c.client.local_steps = 4
  c.client.batch_size = 16
  c.init_checkpoint_skip = '^head'
  c.eval_every = 10
  return c
