from ocp_deq.trainers.deq_trainer import DEQTrainer

__all__ = ["DEQTrainer"]
