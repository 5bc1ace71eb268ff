"""toolkit.hpc"""
