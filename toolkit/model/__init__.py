"""toolkit.model"""
