"""The stages run.py can select with `config.stage`. Each is a function (config, workdir) -> None,
and the only code that reads config sections; the library below (train/, data/, model/) takes
typed pieces of it."""
from typing import Callable

from ml_collections import ConfigDict

from train.stages.chat import chat_stage
from train.stages.dpo import dpo_stage
from train.stages.eval import eval_stage
from train.stages.hparams import hparams_stage
from train.stages.ppo import grpo_stage, ppo_stage
from train.stages.pretrain import pretrain_stage, sample_stage
from train.stages.reward import reward_stage
from train.stages.sft import sft_stage
from train.stages.studies import scaling_stage, sweep_stage
from train.stages.tokenize import tokenize_stage

STAGES: dict[str, Callable[[ConfigDict, str], None]] = {
    'pretrain': pretrain_stage,
    'sample': sample_stage,
    'chat': chat_stage,
    'eval': eval_stage,
    'sft': sft_stage,
    'reward': reward_stage,
    'ppo': ppo_stage,
    'grpo': grpo_stage,
    'dpo': dpo_stage,
    'sweep': sweep_stage,
    'scaling': scaling_stage,
    'hparams': hparams_stage,
    'tokenize': tokenize_stage,
}
