"""phalanx.monitor"""
