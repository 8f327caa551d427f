"""phalanx.testing"""
