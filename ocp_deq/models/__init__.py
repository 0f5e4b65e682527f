from ocp_deq.models.deq_equiformer_v2 import DEQEquiformerV2, DEQEquiformerV2Backbone
from ocp_deq.models.node_force_head import NodeVectorHead

__all__ = ["DEQEquiformerV2", "DEQEquiformerV2Backbone", "NodeVectorHead"]
