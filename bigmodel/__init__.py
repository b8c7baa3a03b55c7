"""bigmodel: architecture × dataset × objective, pretrained once, transferred and analysed."""

__version__ = "0.1.0"
