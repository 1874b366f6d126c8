"""The built-in benchmark prompts (coding and step-by-step arithmetic chat requests), shared by speed.py and
serve_load.py so that their figures are measured on the same requests."""

PROMPTS = [
    "Write a Python function `is_palindrome(s)` that ignores case and non-alphanumeric characters.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Write a Python function `fizzbuzz(n)` returning the list of FizzBuzz strings from 1 to n.",
    "Write a Python function that counts the words in a string and returns a dict of counts.",
    "A train travels 60 miles per hour for 3 hours, then 40 miles per hour for 2 hours. How far does it "
    "travel in total? Think step by step.",
    "Write a Python function `flatten(xs)` that flattens an arbitrarily nested list.",
    "Write a Python class `Stack` with push, pop, peek and is_empty methods.",
    "Write a Python function that returns the n-th prime number.",
    "Write a Python function `rle(s)` that run-length encodes a string.",
    "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left? Think step by step.",
    "Write a Python function that checks whether two strings are anagrams.",
    "Write a Python function `chunks(xs, n)` that splits a list into chunks of size n.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Tom has 5 boxes with 12 apples each. He gives away 17 apples. How many are left? Think step by step.",
    "Write a Python function that returns the longest common prefix of a list of strings.",
]
