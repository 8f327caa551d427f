"""phalanx.checkpoint"""
