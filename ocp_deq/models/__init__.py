from ocp_deq.models.deq_equiformer_v2 import DEQEquiformerV2, DEQEquiformerV2Backbone

__all__ = ["DEQEquiformerV2", "DEQEquiformerV2Backbone"]
