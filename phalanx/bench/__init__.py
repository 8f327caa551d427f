"""phalanx.bench"""
