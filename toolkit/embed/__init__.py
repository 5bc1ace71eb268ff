"""toolkit.embed"""
