"""Training stages (conf/stage/*.yaml): whole-model (Lightning) and block-wise (LKD, Block-AP)."""

from qatlab.stages.base import Stage, StageContext
from qatlab.stages.blockwise import Blockwise, BlockwiseConfig, run_blockwise
from qatlab.stages.whole_model import WholeModel

__all__ = ["Stage", "StageContext", "WholeModel", "Blockwise", "BlockwiseConfig", "run_blockwise"]
