"""phalanx.comm"""
