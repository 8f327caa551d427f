"""phalanx.membership"""
