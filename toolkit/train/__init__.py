"""toolkit.train"""
