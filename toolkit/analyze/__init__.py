"""toolkit.analyze"""
